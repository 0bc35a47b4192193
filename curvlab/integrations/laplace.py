"""laplace-torch backends on curvlab: ``CurvlabGGN`` and ``CurvlabEF``.

``Laplace(model, "classification", hessian_structure="kron", backend=CurvlabGGN)`` uses
curvlab's extraction — any model the hooks engine supports (ResNets with BatchNorm,
transformers, ...), not only the ones laplace-torch's BackPACK and ASDL backends accept.
Install with ``pip install "curvlab[laplace]"`` (laplace-torch 0.3).

What each structure gets (every quantity on laplace-torch's scale: its ``sum``-reduced
loss times ``factor``, ½ for regression):

* ``full``: :class:`~curvlab.ExactFisher` (``stochastic=True``: its Monte-Carlo estimate
  with ``num_samples`` labels) or :class:`~curvlab.EmpiricalFisher`;
* ``kron``: :class:`~curvlab.KFC`'s factors (its public ``factors()`` and
  ``diagonal_blocks()``) with weight and bias in separate blocks, as
  laplace-torch's ``Kron`` expects — ``[G, A]`` for a weight (``A`` without the
  homogeneous coordinate) and ``[G]`` for its bias (the bias's own Kronecker block,
  ``G ⊗ 1``); an embedding's ``[A, G]`` (its weight is the transpose of its matrix);
  every parameter without a Kronecker rule gets curvlab's diagonal Fisher of the same
  type: ``[diag(d)]`` for a vector, and for a matrix (laplace-torch wants two factors
  there) the Frobenius-closest ``diag(u) ⊗ diag(v)``;
* ``diag``: :class:`~curvlab.DiagonalFisher`.

Inputs may be tensors or dicts (passed to the model whole, as laplace-torch does); the
curvature and loss come back in the parameters' dtype. Last-layer and subnetwork Laplace
are refused (``NotImplementedError``). ``scripts/laplace_upstream_tests.py`` runs
laplace-torch's own backend-parametrised tests with these backends added.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.utils import Kron
from torch import Tensor, nn

from curvlab.curvature.base import Curvature
from curvlab.curvature.dense.empirical import EmpiricalFisher
from curvlab.curvature.dense.exact import ExactFisher
from curvlab.curvature.diagonal import DiagonalFisher
from curvlab.curvature.kronecker.kfac import KFC
from curvlab.extraction import layers as layer_rules

__all__ = ["CurvlabEF", "CurvlabGGN"]


class _CurvlabInterface(CurvatureInterface):
    """The three structures from curvlab backends of ``fisher_type``."""

    fisher_type = "exact"
    mc_samples = 1

    @property
    def _loss(self) -> nn.Module:
        return cast(nn.Module, self.lossfunc)  # laplace-torch's sum-reduced loss module

    def _check_supported(self) -> None:
        if self.last_layer or self.subnetwork_indices is not None:
            raise NotImplementedError(
                f"{type(self).__name__}: last-layer and subnetwork Laplace are not supported; "
                "use the full network (every trainable parameter)."
            )

    @property
    def _dtype(self) -> torch.dtype:
        """The parameters' dtype: laplace-torch's quantities are in it (curvlab accumulates
        half and bfloat16 models' statistics in float32)."""
        return self.params[0].dtype

    def _fit(self, curvature: Curvature, x: Any, y: Tensor) -> Tensor:
        """Accumulate the batch into ``curvature``; the loss at the batch, times ``factor``."""
        self._check_supported()
        loss = curvature.update(x, y)
        if [id(p) for p in curvature.params] != [id(p) for p in self.params]:
            raise RuntimeError(
                f"{type(self).__name__}: curvlab's parameter order differs from laplace-torch's "
                "(tied or frozen parameters); use hessian_structure='diag' or another backend."
            )
        return (self.factor * loss).to(self._dtype)

    def _full_curvature(self) -> Curvature:
        """The dense backend of ``full`` (the empirical interface overrides it)."""
        return ExactFisher(
            self.model, self._loss, fisher_type=self.fisher_type, mc_samples=self.mc_samples
        )

    def full(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        c = self._full_curvature()
        loss = self._fit(c, x, y)
        return loss, (self.factor * c.to_dense()).to(self._dtype)

    def diag(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        c = DiagonalFisher(
            self.model, self._loss, fisher_type=self.fisher_type, mc_samples=self.mc_samples
        )
        loss = self._fit(c, x, y)
        return loss, (self.factor * c.diagonal()).to(self._dtype)

    def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        kfc = KFC(
            self.model,
            self._loss,
            fisher_type=self.fisher_type,
            mc_samples=self.mc_samples,
            kfac_approx=kwargs.get("kfac_approx", "expand"),
            output_factor="dense",  # laplace-torch's Kron takes dense factors
            tied="diagonal",  # laplace-torch's Kron has no block for a Kronecker sum
        )
        self._check_supported()
        loss = (self.factor * kfc.update(x, y)).to(self._dtype)
        blocks: dict[int, list[Tensor]] = {}
        for layer, f in zip(kfc.layers, kfc.factors()):
            module = layer.module
            bias = layer_rules.has_trainable_bias(module)
            a = torch.diag(f.A) if f.A.ndim == 1 else f.A  # laplace-torch takes matrices
            a_weight = a[:-1, :-1] if bias else a
            # A is a mean over the batch, G a sum: laplace-torch sums batches to N samples
            g = f.G
            transposed = layer_rules.rule_for(module) is not None and (
                layer_rules.rule_for(module).transposed  # type: ignore[union-attr]
            )
            blocks[id(layer.params[0])] = (
                [a_weight * len(y) / N, g] if transposed else [g, a_weight * len(y) / N]
            )
            if bias:
                blocks[id(layer.params[1])] = [g * a[-1, -1]]
        parameters = dict(zip(kfc.param_names, kfc.params))
        for name, d in kfc.diagonal_blocks().items():
            blocks[id(parameters[name])] = _diagonal_block(d)
        missing = [i for i, p in enumerate(self.params) if id(p) not in blocks]
        if missing:
            raise RuntimeError(
                f"{type(self).__name__}: laplace-torch's parameters {missing} are not covered."
            )
        factors = [[f.to(self._dtype) for f in blocks[id(p)]] for p in self.params]
        kron = Kron(factors)  # type: ignore[arg-type]
        return loss, kron * self.factor


def _diagonal_block(d: Tensor) -> list[Tensor]:
    """laplace-torch's ``Kron`` block of a parameter with diagonal curvature ``d``.

    A vector gets ``[diag(d)]`` (exact). ``Kron`` gives a ``[p₀, …]`` parameter two factors
    ``[p₀×p₀, rest×rest]``; the closest such block to ``diag(d)`` in Frobenius norm is
    ``diag(u) ⊗ diag(v)`` with ``u vᵀ`` the best rank-one approximation of
    ``d.reshape(p₀, -1)`` (its top singular pair, non-negative for ``d ≥ 0``).
    """
    if d.dim() <= 1:
        return [torch.diag(d.reshape(-1))]
    grid = d.reshape(d.shape[0], -1)
    u, s, vh = torch.linalg.svd(grid, full_matrices=False)
    scale = s[0].clamp(min=0).sqrt()
    return [torch.diag(u[:, 0].abs() * scale), torch.diag(vh[0].abs() * scale)]


class CurvlabGGN(_CurvlabInterface, GGNInterface):
    """laplace-torch's GGN interface on curvlab (``stochastic=True``: Monte-Carlo Fisher
    with ``num_samples`` labels per input)."""

    def __init__(
        self,
        model: nn.Module,
        likelihood: Any,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
    ) -> None:
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            stochastic,
            num_samples,
        )
        self.fisher_type = "mc" if stochastic else "exact"
        self.mc_samples = num_samples


class CurvlabEF(_CurvlabInterface, EFInterface):
    """laplace-torch's empirical-Fisher interface on curvlab."""

    fisher_type = "empirical"

    def _full_curvature(self) -> Curvature:
        return EmpiricalFisher(self.model, self._loss)
