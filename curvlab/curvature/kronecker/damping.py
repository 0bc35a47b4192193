"""How :class:`~curvlab.KFAC` damps and inverts one layer's block ``kron(G, A) + λI``
(concepts/kronecker.md#damped-inverse): two strategies, chosen with ``KFAC(damping_mode=...)``.

* :class:`EigenDamping` (``"exact"``, the default): ``(kron(G, A) + λI)⁻¹`` exactly, in the
  factors' eigenbases ``G = Q_G diag(d_G) Q_Gᵀ``, ``A = Q_A diag(d_A) Q_Aᵀ`` — the
  eigendecompositions do not depend on ``λ`` (and serve ``logdet``/``eigenvalues`` too);
* :class:`FactoredDamping` (``"factored"``): Martens & Grosse's
  ``(G + γ/π I)⁻¹ ⊗ (A + πγ I)⁻¹`` with ``γ = √λ`` and π the trace-norm correction
  (:func:`curvlab.linalg.pi_correction`): two Cholesky inverses per layer and damping.

A strategy holds no state: the decompositions it computes are cached on the backend
(``kfac._eigen``, ``kfac._inverses``, ``kfac._structured_cache``), so one strategy object
serves any number of backends; what it reads and writes there is :class:`DampedBackend`.
Each method is one piece of a damped solve: ``decompose`` (what a solve needs, cached),
``solve`` (a dense or diagonal-``A`` layer), ``solve_structured`` (a layer whose ``G`` is
diagonal plus low rank), ``export``/``load`` (the decomposition as named tensors, for
distribution) and ``numel`` (its size, for ``memory_estimate``).
``mat`` is always the layer's ``[W | b]`` gradient matrix ``[D_out, D_in]``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor

from curvlab import linalg
from curvlab.curvature.base import Layer, NamedTensor
from curvlab.curvature.kronecker.factored import KroneckerFactors

__all__ = [
    "DAMPING_MODES",
    "DampedBackend",
    "EigenDamping",
    "FactoredDamping",
    "KroneckerDamping",
    "LayerEigen",
    "damping_strategy",
]


class LayerEigen(NamedTuple):
    """One layer's factor eigendecompositions (``EigenDamping``'s decomposition)."""

    G: linalg.SymmetricEigen
    #: a diagonal input factor is its own eigendecomposition: the (clamped) diagonal ``[D_in]``
    A: linalg.SymmetricEigen | Tensor


class DampedBackend(Protocol):
    """What a strategy reads from and caches on its backend (:class:`~curvlab.KFAC`)."""

    layers: list[Layer]
    num_decompositions: int
    #: per layer, the factors' eigendecompositions (:class:`EigenDamping`; also the spectra)
    _eigen: list[LayerEigen | None] | None
    #: ``(damping, per layer ((G + γ/π I)⁻¹, (A + πγ I)⁻¹))`` (:class:`FactoredDamping`)
    _inverses: tuple[float, list[tuple[Tensor, Tensor] | None]] | None
    #: per structured layer ``(damping, A's eigenpairs or damped inverse, capacitances)``
    _structured_cache: dict[int, tuple[float, Any, Tensor]]

    def _factor(self, k: int) -> KroneckerFactors: ...

    def _layer_label(self, k: int) -> str: ...

    def _in_inverse_dtype(self, t: Tensor) -> Tensor: ...

    def _layer_eigen(self, k: int) -> LayerEigen: ...


class KroneckerDamping(abc.ABC):
    """One way of damping and inverting K-FAC's layer blocks (see the module docstring)."""

    #: the name ``KFAC(damping_mode=name)`` selects it by (a key of :data:`DAMPING_MODES`)
    name: ClassVar[str]

    @abc.abstractmethod
    def decompose(self, kfac: DampedBackend, k: int, damping: float) -> None:
        """Compute and cache on ``kfac`` what solving layer ``k`` at ``damping`` needs."""

    @abc.abstractmethod
    def solve(self, kfac: DampedBackend, k: int, mat: Tensor, damping: float) -> Tensor:
        """Layer ``k``'s damped block solved against ``mat`` ``[D_out, D_in]`` (the result
        in the decomposition's dtype)."""

    @abc.abstractmethod
    def solve_structured(self, kfac: DampedBackend, k: int, mat: Tensor, damping: float) -> Tensor:
        """As :meth:`solve`, for a layer whose ``G = D + U S Uᵀ`` is kept structured (never
        forming ``[D_out, D_out]``; ``damping > 0``)."""

    @abc.abstractmethod
    def export(self, kfac: DampedBackend, k: int, damping: float) -> list[NamedTensor]:
        """Layer ``k``'s cached decomposition at ``damping`` as named tensors."""

    @abc.abstractmethod
    def load(self, kfac: DampedBackend, k: int, damping: float, tensors: list[Tensor]) -> None:
        """Cache on ``kfac`` the decomposition :meth:`export` gave (possibly elsewhere)."""

    @abc.abstractmethod
    def numel(
        self, d_out: int, d_in: int, a_numel: int, g_numel: int, diagonal_a: bool, rank: int | None
    ) -> int:
        """Entries a solve keeps per layer: ``a_numel``/``g_numel`` are the factors' as
        kept, ``diagonal_a`` whether ``A`` is a diagonal, ``rank`` the rank of a structured
        ``G`` (``None``: ``G`` is dense)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EigenDamping(KroneckerDamping):
    """``(kron(G, A) + λI)⁻¹`` exactly, in the eigenbases of ``G`` and ``A``: with
    ``Q_Gᵀ V Q_A`` rotated in, entry ``(i, j)`` is divided by ``d_G[i] d_A[j] + λ``."""

    name = "exact"

    def decompose(self, kfac: DampedBackend, k: int, damping: float) -> None:
        kfac._layer_eigen(k)

    def solve(self, kfac: DampedBackend, k: int, mat: Tensor, damping: float) -> Tensor:
        eig = kfac._layer_eigen(k)
        mat = mat.to(eig.G.eigenvalues.dtype)
        if damping == 0.0:
            _check_invertible(kfac, k, eig.G.eigenvalues, eigenvalues_of(eig.A))
        if isinstance(eig.A, Tensor):  # diagonal A: O(D_out² D_in), no [D_in, D_in] matrix
            return linalg.kron_eigen_diagonal_damped_solve(eig.G, eig.A, mat, damping)
        return linalg.kron_eigen_damped_solve(eig.G, eig.A, mat, damping)

    def solve_structured(self, kfac: DampedBackend, k: int, mat: Tensor, damping: float) -> Tensor:
        """In ``A``'s eigenbasis column ``j`` solves ``(d_A[j] G + λ I) x = b`` by Woodbury
        with the shift ``λ / d_A[j]`` (columns with ``d_A[j] = 0``: ``b / λ``);
        ``O(D_out · r² · D_in)`` once per damping, then ``O(D_out · r · D_in)``."""
        G, a = _structured_factors(kfac, k)
        mat = mat.to(G.d.dtype)
        cached = kfac._structured_cache.get(k)
        if cached is None or cached[0] != damping:
            eig_a = a.clamp(min=0.0) if a.ndim == 1 else psd_eig(a, f"{kfac._layer_label(k)} A")
            d_a = eigenvalues_of(eig_a)
            shifts = damping / d_a.clamp(min=torch.finfo(d_a.dtype).tiny)
            cached = (damping, eig_a, G.capacitances(shifts))
            kfac._structured_cache[k] = cached
            kfac.num_decompositions += 1
        eig_a, caps = cached[1], cached[2]
        d_a = eigenvalues_of(eig_a)
        rotated = mat if isinstance(eig_a, Tensor) else mat @ eig_a.eigenvectors  # [V, D_in]
        positive = d_a > 0
        safe = d_a.clamp(min=torch.finfo(d_a.dtype).tiny)
        solved = G.shifted_solve(rotated / safe, damping / safe, caps)
        solved = torch.where(positive, solved, rotated / damping)
        return solved if isinstance(eig_a, Tensor) else solved @ eig_a.eigenvectors.mT

    def export(self, kfac: DampedBackend, k: int, damping: float) -> list[NamedTensor]:
        label = kfac._layer_label(k)
        eig = None if kfac._eigen is None else kfac._eigen[k]
        if eig is None:
            raise RuntimeError(f"{type(kfac).__name__}: {label} is not decomposed yet.")
        g_parts = [
            NamedTensor(f"{label} G eigenvalues", eig.G.eigenvalues),
            NamedTensor(f"{label} G eigenvectors", eig.G.eigenvectors),
        ]
        if isinstance(eig.A, Tensor):  # a diagonal A: its diagonal alone
            return [*g_parts, NamedTensor(f"{label} A (diagonal)", eig.A)]
        return [
            *g_parts,
            NamedTensor(f"{label} A eigenvalues", eig.A.eigenvalues),
            NamedTensor(f"{label} A eigenvectors", eig.A.eigenvectors),
        ]

    def load(self, kfac: DampedBackend, k: int, damping: float, tensors: list[Tensor]) -> None:
        if kfac._eigen is None:
            kfac._eigen = [None] * len(kfac.layers)
        a = tensors[2] if len(tensors) == 3 else linalg.SymmetricEigen(tensors[2], tensors[3])
        kfac._eigen[k] = LayerEigen(G=linalg.SymmetricEigen(tensors[0], tensors[1]), A=a)

    def numel(
        self, d_out: int, d_in: int, a_numel: int, g_numel: int, diagonal_a: bool, rank: int | None
    ) -> int:
        if rank is not None:  # A's eigenpairs (a diagonal A: its diagonal) and r×r capacitances
            return d_in + (0 if diagonal_a else a_numel) + d_in * rank * rank
        return d_out + g_numel + d_in + (0 if diagonal_a else a_numel)


class FactoredDamping(KroneckerDamping):
    """Martens & Grosse's factored damping: ``(G + γ/π I)⁻¹ V (A + πγ I)⁻¹``, ``γ = √λ``,
    two matmuls per layer (a diagonal ``A``: a scaling). Not ``(kron(G, A) + λI)⁻¹``: the
    cross term ``λ·I⊗I`` is replaced by ``γ(π G⊗I + π⁻¹ I⊗A)``-shaped damping."""

    name = "factored"

    def decompose(self, kfac: DampedBackend, k: int, damping: float) -> None:
        self._inverses(kfac, k, damping)

    def solve(self, kfac: DampedBackend, k: int, mat: Tensor, damping: float) -> Tensor:
        inv_g, inv_a = self._inverses(kfac, k, damping)
        return linalg.kron_matvec(inv_g, inv_a, mat.to(inv_g.dtype))

    def solve_structured(self, kfac: DampedBackend, k: int, mat: Tensor, damping: float) -> Tensor:
        """One Woodbury shift ``γ/π`` for every column: ``(G + γ/π I)⁻¹ (V (A + πγ I)⁻¹)``."""
        G, a = _structured_factors(kfac, k)
        mat = mat.to(G.d.dtype)
        pi = linalg.pi_correction(G.diagonal(), a)
        gamma = damping**0.5
        shifts = (gamma / pi).reshape(1).to(G.d.dtype)
        cached = kfac._structured_cache.get(k)
        if cached is None or cached[0] != damping:
            label = f"{kfac._layer_label(k)} A + πγ I"
            if a.ndim == 1:
                inv_a = diagonal_inverse(a + pi * gamma, label)
            else:
                eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
                inv_a = spd_inverse(a + pi * gamma * eye, label)
            cached = (damping, inv_a, G.capacitances(shifts))
            kfac._structured_cache[k] = cached
            kfac.num_decompositions += 1
        inv_a, caps = cached[1], cached[2]
        right = mat * inv_a if inv_a.ndim == 1 else mat @ inv_a
        m = right.shape[1]
        return G.shifted_solve(right, shifts.expand(m), caps.expand(m, -1, -1))

    def export(self, kfac: DampedBackend, k: int, damping: float) -> list[NamedTensor]:
        label = kfac._layer_label(k)
        pair = None
        if kfac._inverses is not None and kfac._inverses[0] == damping:
            pair = kfac._inverses[1][k]
        if pair is None:
            raise RuntimeError(f"{type(kfac).__name__}: {label} is not decomposed yet.")
        return [
            NamedTensor(f"{label} (G + γ/π I)⁻¹", pair[0], "symmetric"),
            NamedTensor(
                f"{label} (A + πγ I)⁻¹", pair[1], "symmetric" if pair[1].ndim == 2 else "general"
            ),
        ]

    def load(self, kfac: DampedBackend, k: int, damping: float, tensors: list[Tensor]) -> None:
        if kfac._inverses is None or kfac._inverses[0] != damping:
            kfac._inverses = (damping, [None] * len(kfac.layers))
        kfac._inverses[1][k] = (tensors[0], tensors[1])

    def numel(
        self, d_out: int, d_in: int, a_numel: int, g_numel: int, diagonal_a: bool, rank: int | None
    ) -> int:
        if rank is not None:  # (A + πγ I)⁻¹ and one r×r capacitance
            return a_numel + rank * rank
        return g_numel + a_numel

    def _inverses(self, kfac: DampedBackend, k: int, damping: float) -> tuple[Tensor, Tensor]:
        """Layer ``k``'s ``((G + γ/π I)⁻¹, (A + πγ I)⁻¹)``, cached per damping."""
        if kfac._inverses is None or kfac._inverses[0] != damping:
            kfac._inverses = (damping, [None] * len(kfac.layers))
        cached = kfac._inverses[1][k]
        if cached is None:
            f = kfac._factor(k)
            damped_g, damped_a = linalg.factored_damping(
                kfac._in_inverse_dtype(f.G), kfac._in_inverse_dtype(f.A), damping
            )
            label = kfac._layer_label(k)
            cached = (
                spd_inverse(damped_g, f"{label} G + γ/π I"),
                diagonal_inverse(damped_a, f"{label} A + πγ I")
                if damped_a.ndim == 1
                else spd_inverse(damped_a, f"{label} A + πγ I"),
            )
            kfac._inverses[1][k] = cached
            kfac.num_decompositions += 1
        return cached


#: The one table of named strategies: ``KFAC(damping_mode=name)`` looks ``name`` up here.
DAMPING_MODES: Mapping[str, KroneckerDamping] = MappingProxyType(
    {s.name: s for s in (EigenDamping(), FactoredDamping())}
)


def damping_strategy(damping_mode: str | KroneckerDamping | None, owner: str) -> KroneckerDamping:
    """The strategy ``damping_mode`` selects: ``None`` is ``"exact"``, a name is looked up
    in :data:`DAMPING_MODES`, a :class:`KroneckerDamping` is itself."""
    if damping_mode is None:
        return DAMPING_MODES["exact"]
    if isinstance(damping_mode, KroneckerDamping):
        return damping_mode
    if isinstance(damping_mode, str):
        if damping_mode not in DAMPING_MODES:
            raise ValueError(
                f"{owner}: unknown damping_mode {damping_mode!r}; choose one of "
                f"{tuple(DAMPING_MODES)} or pass a KroneckerDamping strategy."
            )
        return DAMPING_MODES[damping_mode]
    raise TypeError(
        f"{owner}: damping_mode must be one of {tuple(DAMPING_MODES)} or a KroneckerDamping "
        f"strategy, got {type(damping_mode).__name__}."
    )


# --- factor helpers ---------------------------------------------------------------------------


def _structured_factors(kfac: DampedBackend, k: int) -> tuple[linalg.DiagonalPlusLowRank, Tensor]:
    """Layer ``k``'s structured ``G`` and its ``A`` in the inverse dtype (``damping > 0``)."""
    f = kfac._factor(k)
    G = f.G.to(kfac._in_inverse_dtype(f.G.d).dtype)
    return G, kfac._in_inverse_dtype(f.A)


def _check_invertible(kfac: DampedBackend, k: int, d_g: Tensor, d_a: Tensor) -> None:
    smallest = d_g.min() * d_a.min()
    largest = d_g.max() * d_a.max()
    tiny = torch.finfo(d_g.dtype).eps * largest
    if not bool(smallest > tiny):
        raise linalg.LinAlgError(
            f"{type(kfac).__name__}.solve: {kfac._layer_label(k)} kron(G, A) is singular "
            f"(smallest eigenvalue {float(smallest):.3g}); use damping > 0."
        )


def psd_eig(M: Tensor, name: str) -> linalg.SymmetricEigen:
    """Eigenpairs of a PSD factor; negative eigenvalues are rounding and are clamped."""
    d, q = linalg.symeig(M, name=name)
    return linalg.SymmetricEigen(d.clamp(min=0.0), q)


def eigenvalues_of(eig: linalg.SymmetricEigen | Tensor) -> Tensor:
    """A factor's eigenvalues (a diagonal factor's: its diagonal, unsorted)."""
    return eig if isinstance(eig, Tensor) else eig.eigenvalues


def diagonal_inverse(a: Tensor, name: str) -> Tensor:
    """``1/a`` of a damped diagonal factor (clear error where an entry is not positive)."""
    if not bool((a > 0).all()):
        raise linalg.LinAlgError(
            f"{name} (diagonal [{a.shape[0]}]) is not positive definite: smallest entry "
            f"{float(a.min()):.3g}; use damping > 0."
        )
    return 1.0 / a


def spd_inverse(M: Tensor, name: str) -> Tensor:
    """``M⁻¹`` of a (damped) SPD factor via Cholesky (float64 retry, clear error)."""
    chol = linalg.cholesky_factor(M, name=name, keep_float64=True)
    return torch.cholesky_inverse(chol).to(M.dtype)
