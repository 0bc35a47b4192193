"""``NoisyKFAC``: noisy natural gradient with a Kronecker-factored Gaussian posterior
(Zhang, Sun, Duvenaud & Grosse 2018), as a ``torch.optim.Optimizer``.

Variational inference with ``q(w) = N(μ, Σ)`` and the prior ``p(w) = N(0, τ⁻¹ I)``,
maximising ``ELBO = E_q[log p(D | w)] − λ·KL(q ‖ p)`` over a data set of ``N`` examples
(concepts/noisy_natural_gradient.md). Per step:

1. sample ``w ~ q`` (the very first step uses ``w = μ``: there is no covariance yet);
2. at ``w``: the gradient ``g`` of the average negative log-likelihood ``ℓ̄`` of the batch
   and, every ``update_every`` steps, the K-FAC factors ``(A, G)`` of each layer, blended
   into moving averages (``G`` on the scale of one example's negative log-likelihood);
3. ``μ ← μ − α (F̃ + γ_ex I)⁻¹ (g + γ_in μ)`` per layer, with ``γ_in = λτ/N`` and
   ``γ_ex = γ_in + damping``;
4. ``Σ = (λ/N) (F̃ + γ_in I)⁻¹`` per layer, ``F̃ = kron(G, A)`` on the row-major
   ``[W | b]`` matrix, damped exactly in the factors' eigenbases (``damping_mode="exact"``)
   or by the factored π-damping (``"factored"``, a matrix-normal posterior).

Decompositions are refreshed every ``invert_every`` steps; ``q`` (sampling, ``logdet``,
``kl``, ``covariance``) is the one of the last refresh.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from curvlab import linalg
from curvlab.curvature.kronecker.factored import KroneckerFactors
from curvlab.curvature.kronecker.kfac import KFAC, LayerSpec
from curvlab.extraction import batch_scale
from curvlab.extraction import layers as layer_rules
from curvlab.linalg.damping import check_damping

__all__ = ["NOISY_DAMPING_MODES", "NoisyKFAC"]

#: How the posterior precision ``(N/λ)(kron(G, A) + γ I)`` is damped.
NOISY_DAMPING_MODES = ("exact", "factored")


class _Eigen(NamedTuple):
    """``exact`` mode: the factors' eigenpairs; ``D = d_G d_Aᵀ``."""

    G: linalg.SymmetricEigen
    A: linalg.SymmetricEigen


class _Factored(NamedTuple):
    """``factored`` mode: Cholesky factors of the π-damped factors, for ``γ_in`` (the
    posterior) and ``γ_ex`` (the mean's update)."""

    L_G: Tensor
    L_A: Tensor
    L_G_ex: Tensor
    L_A_ex: Tensor


class NoisyKFAC(torch.optim.Optimizer):
    """Noisy K-FAC: natural-gradient variational inference with a Kronecker-factored
    Gaussian posterior per layer (concepts/noisy_natural_gradient.md).

    Args:
        model: the network; every layer with trainable parameters must have a Kronecker
            rule (``nn.Linear``, ``nn.ConvNd``, ``nn.Embedding``, registered types), else a
            ``ValueError`` names it (leave it out with ``exclude=``: its parameters then stay
            fixed).
        loss_fn: the negative log-likelihood of the data: ``CrossEntropyLoss``
            (categorical), ``BCEWithLogitsLoss`` (Bernoulli) or ``MSELoss`` (Gaussian with
            variance ½ per output: ``−log p(y | f) = ‖y − f‖² + (C/2)·log π``), mean or sum,
            on ``[N, C]`` outputs.
        dataset_size: ``N``, the number of training examples (rows) the ELBO is over.
        lr: ``α``, the step size of the mean's natural-gradient update (``1``: a full step).
        prior_precision: ``τ`` of the prior ``N(0, τ⁻¹ I)`` on every covered parameter.
        kl_weight: ``λ``, the weight of the KL term (``1``: the ELBO; ``< 1`` tempers it).
        damping: extrinsic damping added to ``γ_in = λτ/N`` in the mean's update only (on
            the per-example scale, like :class:`~curvlab.NaturalGradient`'s default 0.1): it
            bounds the steps where ``kron(G, A)`` is small; ``0`` is the paper's bare update.
        ema_decay: factors' moving average ``X ← εX + (1 − ε)X_batch`` with
            ``ε = min(1 − 1/k, ema_decay)`` at the ``k``-th statistics step.
        update_every: steps between K-FAC statistics.
        invert_every: steps between refreshes of the decompositions (and so of ``q``).
        fisher_type, mc_samples: the Fisher type of the factors (``"mc"``: the paper's
            sampled labels, ``"exact"``, ``"empirical"``).
        damping_mode: ``"exact"`` (default): ``(kron(G, A) + γI)`` in the factors'
            eigenbases; ``"factored"``: ``(G + √γ/π I) ⊗ (A + π√γ I)``, the paper's
            matrix-normal posterior.
        layers, exclude, engine: as for :class:`~curvlab.KFAC`.
        generator: the random generator of the weight samples (``None``: torch's global).

    ``step(closure)``: ``closure()`` computes ``loss_fn(model(x), y)`` on the batch and
    returns it *without* calling ``backward``; the optimizer runs it at a weight sample,
    backpropagates and puts the mean back into the parameters (``p.grad`` stays the
    gradient at the sample). Returns the loss at the sample.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        dataset_size: int,
        lr: float,
        prior_precision: float = 1.0,
        kl_weight: float = 1.0,
        damping: float = 0.1,
        ema_decay: float = 0.95,
        update_every: int = 1,
        invert_every: int = 1,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        damping_mode: str = "exact",
        layers: Sequence[LayerSpec] | None = None,
        exclude: Sequence[LayerSpec] | None = None,
        engine: str = "auto",
        generator: torch.Generator | None = None,
    ) -> None:
        owner = "NoisyKFAC"
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
            raise ValueError(f"{owner}: dataset_size must be an int >= 1, got {dataset_size!r}.")
        for name, value in (
            ("lr", lr),
            ("prior_precision", prior_precision),
            ("kl_weight", kl_weight),
        ):
            if not _is_real(value) or not 0.0 < value < math.inf:
                raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}.")
        check_damping(damping, owner)
        if not _is_real(ema_decay) or not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"{owner}: ema_decay must lie in [0, 1), got {ema_decay!r}.")
        for name, count in (("update_every", update_every), ("invert_every", invert_every)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{owner}: {name} must be an int >= 1, got {count!r}.")
        if damping_mode not in NOISY_DAMPING_MODES:
            raise ValueError(
                f"{owner}: unknown damping_mode {damping_mode!r}; choose one of "
                f"{NOISY_DAMPING_MODES}."
            )
        self.curvature = KFAC(
            model,
            loss_fn,
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            layers=layers,
            exclude=exclude,
            engine=engine,
            output_factor="dense",  # its posterior samples need dense factors
            tied="diagonal",  # a Kronecker sum has no Kronecker-factored posterior
        )
        for param_name, kind in self.curvature.coverage().items():
            if kind != "kronecker":
                module = param_name.rsplit(".", 1)[0] if "." in param_name else param_name
                self.curvature.close()
                raise ValueError(
                    f"{owner}: module '{module}' (parameter '{param_name}') has no Kronecker "
                    f"rule ({kind} block), so it has no Kronecker-factored posterior; pass "
                    f"exclude=['{module}'] to keep its parameters fixed, or register a rule "
                    "with curvlab.extraction.layers.register_kronecker_rule."
                )
        self.model = model
        self.loss_fn = loss_fn
        self.dataset_size = dataset_size
        self.prior_precision = float(prior_precision)
        self.kl_weight = float(kl_weight)
        self.damping = float(damping)
        self.ema_decay = float(ema_decay)
        self.update_every = update_every
        self.invert_every = invert_every
        self.damping_mode = damping_mode
        self.generator = generator
        self.steps = 0
        self._decomposition: list[_Eigen | _Factored] | None = None
        self._stale = False  # factors changed since the last decomposition
        super().__init__(self.curvature.params, {"lr": float(lr)})
        for layer in self.curvature.layers:
            d_out, d_in = layer_rules.weight_matrix_shape(layer.module)
            weight = layer.params[0]
            self.state[weight] = {
                "A": weight.detach().new_zeros(d_in, d_in),
                "G": weight.detach().new_zeros(d_out, d_out),
                "statistics_steps": 0,
            }

    # --- the ELBO's constants ----------------------------------------------------------

    @property
    def intrinsic_damping(self) -> float:
        """``γ_in = λτ/N``: the prior's share of the posterior precision, per example."""
        return self.kl_weight * self.prior_precision / self.dataset_size

    @property
    def num_params(self) -> int:
        """``P``, the number of parameters with a posterior."""
        return sum(p.numel() for p in self.curvature.params)

    # --- factors ----------------------------------------------------------------------

    def factors(self) -> list[KroneckerFactors]:
        """Per layer the moving averages ``(A, G)`` as :class:`~curvlab.KroneckerFactors`
        (``G`` on the scale of one example's negative log-likelihood)."""
        return [
            KroneckerFactors(A=self.state[layer.params[0]]["A"], G=self.state[layer.params[0]]["G"])
            for layer in self.curvature.layers
        ]

    def _decompose(self) -> list[_Eigen | _Factored]:
        if self._decomposition is not None:
            return self._decomposition
        out: list[_Eigen | _Factored] = []
        for k, f in enumerate(self.factors()):
            label = _label(self.curvature, k)
            if self.damping_mode == "exact":
                out.append(_Eigen(G=_psd_eig(f.G, f"{label} G"), A=_psd_eig(f.A, f"{label} A")))
                continue
            chol = []
            for gamma in (self.intrinsic_damping, self.intrinsic_damping + self.damping):
                damped_g, damped_a = linalg.factored_damping(f.G, f.A, gamma)
                chol.append(linalg.cholesky_factor(damped_g, name=f"{label} G + √γ/π I"))
                chol.append(linalg.cholesky_factor(damped_a, name=f"{label} A + π√γ I"))
            out.append(_Factored(*chol))
        self._decomposition = out
        return out

    # --- the step ---------------------------------------------------------------------

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One step (see the class docstring); returns the loss at the weight sample."""
        if closure is None:
            raise TypeError(
                "NoisyKFAC.step: pass a closure that returns loss_fn(model(x), y) without "
                "calling backward, e.g. opt.step(lambda: loss_fn(model(x), y))."
            )
        step = self.steps + 1  # counted once the step succeeds
        statistics_due = (step - 1) % self.update_every == 0
        first = self._statistics_steps() == 0
        params = self.curvature.params
        means = [p.detach().clone() for p in params]
        calls: list[tuple[Tensor, Tensor]] = []

        def capture(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            calls.append((args[0], args[1]))

        handle = self.loss_fn.register_forward_hook(capture)
        try:
            if not first:
                self._write_sample(means)
            with torch.enable_grad():
                recording = self.curvature.recording() if statistics_due or first else None
                with recording if recording is not None else contextlib.nullcontext():
                    loss = closure()
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    raise TypeError("NoisyKFAC.step: the closure must return the scalar loss.")
                if not calls:
                    raise RuntimeError(
                        "NoisyKFAC.step: the closure did not call the optimizer's loss_fn; "
                        "compute the loss as loss_fn(model(x), y)."
                    )
                if not bool(torch.isfinite(loss.detach())):
                    raise FloatingPointError(
                        f"NoisyKFAC.step: the loss at the weight sample is not finite "
                        f"({float(loss.detach())}); lower lr or raise prior_precision."
                    )
                if recording is not None:
                    self.curvature.reset()
                    self.curvature.accumulate(loss)
                for p in params:
                    p.grad = None
                loss.backward()
        finally:
            handle.remove()
            with torch.no_grad():
                for p, m in zip(params, means):
                    p.copy_(m)
        outputs, targets = calls[-1]
        scale = batch_scale(self.loss_fn, outputs.detach(), targets)
        per_example = scale.inv_reduction / scale.num_samples  # loss scale → ℓ̄'s scale
        if recording is not None:
            self._blend(per_example)
        if first or (self._stale and (step - 1) % self.invert_every == 0):
            self._decomposition, self._stale = None, False
        self._update_means(per_example)
        self.steps = step
        return loss.detach()

    def _statistics_steps(self) -> int:
        return int(self.state[self.curvature.layers[0].params[0]]["statistics_steps"])

    @torch.no_grad()
    def _blend(self, per_example: float) -> None:
        self._stale = True
        for layer, batch in zip(self.curvature.layers, self.curvature.factors()):
            state = self.state[layer.params[0]]
            state["statistics_steps"] += 1
            eps = min(1.0 - 1.0 / state["statistics_steps"], self.ema_decay)
            a = batch.A if batch.A.ndim == 2 else torch.diag(batch.A)  # a diagonal factor
            state["A"] = eps * state["A"] + (1.0 - eps) * a.to(state["A"].dtype)
            state["G"] = eps * state["G"] + (1.0 - eps) * per_example * batch.G.to(state["G"].dtype)

    @torch.no_grad()
    def _update_means(self, per_example: float) -> None:
        lr = self.param_groups[0]["lr"]
        gamma_in, gamma_ex = self.intrinsic_damping, self.intrinsic_damping + self.damping
        for layer, dec in zip(self.curvature.layers, self._decompose()):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in layer.params]
            g = _matrix(layer, grads)
            mu = _matrix(layer, [p.detach() for p in layer.params])
            v = (per_example * g + gamma_in * mu).to(_dtype(dec))
            if isinstance(dec, _Eigen):
                delta = linalg.kron_eigen_damped_solve(dec.G, dec.A, v, gamma_ex)
            else:
                delta = linalg.kron_cholesky_solve(dec.L_G_ex, dec.L_A_ex, v)
            for p, d in zip(layer.params, layer_rules.from_matrix(layer.module, delta)):
                p.sub_(d.to(p.dtype), alpha=lr)

    # --- the posterior ----------------------------------------------------------------

    def _noise(self) -> list[Tensor]:
        """One draw of ``w − μ`` per parameter (list shaped like ``params``)."""
        scale = math.sqrt(self.kl_weight / self.dataset_size)
        gamma = self.intrinsic_damping
        out: list[Tensor] = []
        for layer, dec in zip(self.curvature.layers, self._decompose()):
            d_out, d_in = layer_rules.weight_matrix_shape(layer.module)
            e = torch.randn(
                d_out, d_in, generator=self.generator, dtype=_dtype(dec), device=_device(dec)
            )
            if isinstance(dec, _Eigen):
                denom = torch.outer(dec.G.eigenvalues, dec.A.eigenvalues) + gamma
                z = dec.G.eigenvectors @ (e / denom.sqrt()) @ dec.A.eigenvectors.mT
            else:  # L_Gᵀ⁻¹ E L_A⁻¹: covariance G_γ⁻¹ ⊗ A_γ⁻¹ of the row-major vec
                z = torch.linalg.solve_triangular(dec.L_G.mT, e, upper=True)
                z = torch.linalg.solve_triangular(dec.L_A, z, upper=False, left=False)
            parts = layer_rules.from_matrix(layer.module, scale * z)
            out.extend(d.to(p.dtype) for d, p in zip(parts, layer.params))
        return out

    @torch.no_grad()
    def _write_sample(self, means: list[Tensor]) -> None:
        for p, m, n in zip(self.curvature.params, means, self._noise()):
            p.copy_(m + n)

    @contextlib.contextmanager
    def sampled(self) -> Iterator[list[Tensor]]:
        """Context manager: the model's parameters hold one sample ``w ~ q`` inside (yielded
        as a list shaped like ``params``), the mean ``μ`` again on exit."""
        params = self.curvature.params
        means = [p.detach().clone() for p in params]
        try:
            self._write_sample(means)
            yield [p.detach().clone() for p in params]
        finally:
            with torch.no_grad():
                for p, m in zip(params, means):
                    p.copy_(m)

    @torch.no_grad()
    def predictive_samples(self, inputs: Any, num_samples: int = 10) -> Tensor:
        """``model(inputs)`` under ``num_samples`` weight samples: ``[S, *output.shape]``
        (logits or means; average ``softmax`` over ``S`` for the predictive)."""
        _check_samples(num_samples, "predictive_samples")
        outs = []
        for _ in range(num_samples):
            with self.sampled():
                outs.append(self.model(inputs))
        return torch.stack(outs)

    def logdet(self) -> Tensor:
        """``log det Σ`` (float64 scalar): the covariance's closed form per layer."""
        log_scale = math.log(self.kl_weight / self.dataset_size)
        total = torch.zeros((), dtype=torch.float64)
        for layer, dec in zip(self.curvature.layers, self._decompose()):
            d_out, d_in = layer_rules.weight_matrix_shape(layer.module)
            if isinstance(dec, _Eigen):
                denom = torch.outer(dec.G.eigenvalues, dec.A.eigenvalues) + self.intrinsic_damping
                logdet_precision = denom.double().log().sum()
            else:
                logdet_precision = 2 * (
                    d_in * dec.L_G.diagonal().double().log().sum()
                    + d_out * dec.L_A.diagonal().double().log().sum()
                )
            total = total + d_out * d_in * log_scale - logdet_precision.cpu()
        return total

    def _trace(self) -> Tensor:
        """``tr Σ`` (float64)."""
        scale = self.kl_weight / self.dataset_size
        total = torch.zeros((), dtype=torch.float64)
        for dec in self._decompose():
            if isinstance(dec, _Eigen):
                denom = torch.outer(dec.G.eigenvalues, dec.A.eigenvalues) + self.intrinsic_damping
                tr = (1.0 / denom.double()).sum()
            else:
                tr = _inverse_trace(dec.L_G) * _inverse_trace(dec.L_A)
            total = total + scale * tr.cpu()
        return total

    def kl(self) -> Tensor:
        """``KL(q ‖ p)`` in closed form (float64 scalar):
        ``½[τ tr Σ + τ‖μ‖² − P − P log τ − log det Σ]``."""
        tau, count = self.prior_precision, self.num_params
        mean_sq = sum(float(p.detach().double().square().sum()) for p in self.curvature.params)
        return 0.5 * (
            tau * self._trace() + tau * mean_sq - count - count * math.log(tau) - self.logdet()
        )

    @torch.no_grad()
    def expected_log_likelihood(
        self, inputs: Any, targets: Tensor, num_samples: int = 10
    ) -> Tensor:
        """Monte-Carlo estimate of ``E_q[log p(D | w)]`` from one batch (float64 scalar): the
        batch's log-likelihood averaged over ``num_samples`` weight samples, times
        ``N / batch size`` (exact for the whole data set as one batch)."""
        _check_samples(num_samples, "expected_log_likelihood")
        total = 0.0
        rows = 1
        for _ in range(num_samples):
            with self.sampled():
                outputs = self.model(inputs)
                nll, rows = _batch_nll(self.loss_fn, outputs, targets)
            total += nll
        return torch.tensor(-total / num_samples * self.dataset_size / rows, dtype=torch.float64)

    def elbo(self, inputs: Any, targets: Tensor, num_samples: int = 10) -> Tensor:
        """``E_q[log p(D | w)] − λ·KL(q ‖ p)``, the first term estimated as in
        :meth:`expected_log_likelihood` (float64 scalar)."""
        ell = self.expected_log_likelihood(inputs, targets, num_samples)
        return ell - self.kl_weight * self.kl()

    def covariance(self) -> Tensor:
        """The dense ``Σ`` ``[P, P]`` (block-diagonal over layers, ``params`` order with
        ``[vec(W), b]`` per layer; small models only)."""
        scale = self.kl_weight / self.dataset_size
        blocks = []
        for layer, dec in zip(self.curvature.layers, self._decompose()):
            if isinstance(dec, _Eigen):
                q = torch.kron(dec.G.eigenvectors, dec.A.eigenvectors)
                denom = torch.outer(dec.G.eigenvalues, dec.A.eigenvalues) + self.intrinsic_damping
                block = q @ torch.diag(1.0 / denom.reshape(-1)) @ q.mT
            else:
                block = torch.kron(torch.cholesky_inverse(dec.L_G), torch.cholesky_inverse(dec.L_A))
            perm = layer_rules.parameter_order(layer.module).to(block.device)
            blocks.append(scale * block[perm][:, perm])
        return torch.block_diag(*blocks)

    def mean(self) -> list[Tensor]:
        """``μ``: copies of the covered parameters (the model holds them between steps)."""
        return [p.detach().clone() for p in self.curvature.params]

    # --- state ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["noisy_kfac_steps"] = self.steps
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.steps = int(state_dict.pop("noisy_kfac_steps", 0))
        super().load_state_dict(state_dict)
        self._decomposition = None

    def close(self) -> None:
        """Remove the curvature's hooks from the model (the posterior stays usable)."""
        self.curvature.close()


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_samples(num_samples: int, op: str) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"NoisyKFAC.{op}: num_samples must be an int >= 1, got {num_samples!r}.")


def _label(curvature: KFAC, k: int) -> str:
    layer = curvature.layers[k]
    return f"NoisyKFAC: layer '{layer.name}' ({type(layer.module).__name__})"


def _matrix(layer: Any, parts: list[Tensor]) -> Tensor:
    return layer_rules.to_matrix(layer.module, parts[0], parts[1] if len(parts) > 1 else None)


def _dtype(dec: _Eigen | _Factored) -> torch.dtype:
    return dec.G.eigenvectors.dtype if isinstance(dec, _Eigen) else dec.L_G.dtype


def _device(dec: _Eigen | _Factored) -> torch.device:
    return dec.G.eigenvectors.device if isinstance(dec, _Eigen) else dec.L_G.device


def _psd_eig(m: Tensor, name: str) -> linalg.SymmetricEigen:
    d, q = linalg.symeig(m, name=name)
    return linalg.SymmetricEigen(d.clamp(min=0.0), q)


def _inverse_trace(chol: Tensor) -> Tensor:
    """``tr(M⁻¹)`` from ``M = L Lᵀ``: ``‖L⁻¹‖_F²``."""
    eye = torch.eye(len(chol), dtype=chol.dtype, device=chol.device)
    return torch.linalg.solve_triangular(chol, eye, upper=False).double().square().sum()


def _batch_nll(loss_fn: nn.Module, outputs: Tensor, targets: Tensor) -> tuple[float, int]:
    """``(Σ_n −log p(y_n | f_n), n)`` over the batch, with the likelihood's constants."""
    scale = batch_scale(loss_fn, outputs, targets)
    total = float(loss_fn(outputs, targets)) * scale.inv_reduction
    if isinstance(loss_fn, nn.MSELoss):  # N(f, ½): −log p = (y − f)² + ½ log π per output
        total += 0.5 * math.log(math.pi) * outputs.numel()
    return total, scale.num_samples
