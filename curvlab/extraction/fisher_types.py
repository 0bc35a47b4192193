"""Fisher types: which output matrix a curvature is built from, and how its columns are formed.

Every Fisher type reaches the engines as *output-space columns*: a tensor ``[K, N, C]``
whose columns ``u_k`` satisfy ``Σ_k u_k[n] u_k[n]ᵀ = R·M_n`` row by row (``R`` the loss's
reduction factor; concepts/fisher_types.md), with ``M_n``

* :attr:`FisherType.EXACT` (``"exact"``): the loss's output matrix (its Hessian w.r.t.
  row ``n``'s output, = the Fisher's output matrix for the supported losses) from its
  square root (``K = C``);
* :attr:`FisherType.MC` (``"mc"``): its Monte-Carlo estimate ``(1/M) Σ_m g̃_m g̃_mᵀ`` with
  ``g̃_m`` the label gradient at ``ỹ_m ~ p(y | f_n)`` (``K = M``, ``mc_samples``);
* :attr:`FisherType.EMPIRICAL` (``"empirical"``): the label gradient at the observed label,
  ``∇_f ℓ(f_n, y_n) ∇_f ℓ(f_n, y_n)ᵀ`` (``K = 1``).

The rule for each type lives here, in :data:`_RULES`, and the engines ask the type
(:meth:`FisherType.columns` and the properties below) instead of comparing names. The
rules use only the loss primitives of :mod:`curvlab.extraction.losses` (square root of the
output matrix, label sampling, label gradient, observed labels), which every supported
loss and every :class:`~curvlab.extraction.losses.LikelihoodLoss` provides.

**Adding a Fisher type**. A type is a statement about the curvature every engine must
honour, so it is a :class:`ColumnRule` and nothing else: the engines and backends derive
everything from the rule (its columns, whether they are sampled, whether they estimate
the true Fisher).

* In the library: a member of :class:`FisherType` and its rule in :data:`_RULES` (the
  import fails if a member has no rule); optionally its BackPACK extensions in the table
  of :mod:`curvlab.extraction.backpack_engine`. Without an entry there the BackPACK engine
  refuses the type with a reason, so ``engine="auto"`` uses the hooks engine and
  ``engine="backpack"`` raises. Two files at most.
* From outside the library: :meth:`FisherType.register` with a value and a rule. The
  returned object is a :class:`FisherType` (``FisherType("value")`` and every backend's
  ``fisher_type="value"`` find it) that is not one of the enum's members (iterating
  ``FisherType`` and :data:`FISHER_TYPES` list the built-in types; :meth:`FisherType.known`
  lists all). :meth:`FisherType.unregister` removes it again.

An unknown value is refused with a ``ValueError`` naming the argument's owner and the
known types (:meth:`FisherType.parse`), where a backend or a request is built; no engine
computes it as another type. Nothing else in the library branches on a Fisher type's
name (``tests/extraction/test_fisher_types.py`` checks this).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from math import sqrt

import torch
from torch import Tensor, nn

from curvlab.extraction.losses import (
    BatchScale,
    label_gradient,
    observed_labels,
    output_matrix_sqrt,
    sample_targets,
)

__all__ = ["FISHER_TYPES", "ColumnFunction", "ColumnRule", "FisherType"]


class FisherType(str, Enum):
    """The Fisher type of a curvature; a ``str``, so ``FisherType("mc")``,
    ``FisherType.MC == "mc"`` and ``{"mc": ...}[FisherType.MC]`` all work.

    Public arguments take the member or its string; :meth:`parse` validates and converts
    once, where a backend or a request is built. The members are the built-in types;
    :meth:`register` adds one from outside the library (module docstring).
    """

    EXACT = "exact"
    MC = "mc"
    EMPIRICAL = "empirical"

    # a str in every respect: printed, formatted and hashed as its value
    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value

    def __format__(self, format_spec: str) -> str:
        return format(self.value, format_spec)

    @classmethod
    def known(cls) -> tuple[FisherType, ...]:
        """Every Fisher type: the built-in members, then the registered types in the order
        of :meth:`register`."""
        return tuple(_RULES)

    @classmethod
    def parse(
        cls,
        value: object,
        owner: str,
        allowed: Iterable[str] | Callable[[FisherType], bool] | None = None,
    ) -> FisherType:
        """``value`` (a type or its string) as a :class:`FisherType`; a ``ValueError``
        naming ``owner`` and the allowed values if it is no known type, or not one of
        ``allowed``: values, or a test of the type (default: every known type)."""
        known = cls.known()
        if allowed is None:
            choices = [t.value for t in known]
        elif callable(allowed):
            choices = [t.value for t in known if allowed(t)]
        else:
            choices = [cls(a).value for a in allowed]
        member = None
        if isinstance(value, cls):
            member = value
        elif isinstance(value, str) and value in cls._value2member_map_:
            member = cls(value)
        if member is None or member.value not in choices:
            shown = repr(value.value) if isinstance(value, cls) else repr(value)
            raise ValueError(f"{owner}: unknown fisher_type {shown}; choose one of {choices}.")
        return member

    @classmethod
    def register(cls, value: str, rule: ColumnRule) -> FisherType:
        """A new Fisher type ``value`` whose columns follow ``rule``, from outside the
        library (module docstring); every backend and the hooks engine then take
        ``fisher_type=value``. A ``ValueError`` if ``value`` is empty or taken.

        The type is a *pseudo-member*, as :class:`enum.Flag` makes for its combinations:
        an instance of :class:`FisherType` in the enum's value map, not one of its
        members (``list(FisherType)`` is unchanged).
        """
        if not isinstance(value, str) or not value:
            raise ValueError(f"FisherType.register: value must be a non-empty str, got {value!r}.")
        if value in cls._value2member_map_:
            raise ValueError(f"FisherType.register: a Fisher type {value!r} already exists.")
        if not isinstance(rule, ColumnRule):
            raise TypeError(
                f"FisherType.register: rule must be a ColumnRule, got {type(rule).__name__}."
            )
        member = str.__new__(cls, value)
        member._value_ = value
        member._name_ = value
        cls._value2member_map_[value] = member
        _RULES[member] = rule
        return member

    @classmethod
    def unregister(cls, value: str | FisherType) -> None:
        """Remove a type added by :meth:`register` (a ``ValueError`` for a built-in
        member or an unknown value)."""
        key = value.value if isinstance(value, cls) else value
        builtin = isinstance(key, str) and key in FISHER_TYPES
        if builtin or not isinstance(key, str) or key not in cls._value2member_map_:
            raise ValueError(
                f"FisherType.unregister: {key!r} is not a registered Fisher type (registered: "
                f"{[t.value for t in cls.known() if t.value not in FISHER_TYPES]})."
            )
        del _RULES[cls._value2member_map_.pop(key)]  # type: ignore[arg-type]

    @property
    def rule(self) -> ColumnRule:
        """How this type's columns are formed, and what they estimate."""
        return _RULES[self]

    @property
    def sampled(self) -> bool:
        """Whether the columns are random draws, ``mc_samples`` per loss row."""
        return self.rule.sampled

    @property
    def exact_output_matrix(self) -> bool:
        """Whether ``Σ_k u_k u_kᵀ`` is the loss's output matrix itself, so products with it
        need no columns (:func:`~curvlab.extraction.losses.output_hessian_apply`)."""
        return self.rule.exact

    @property
    def true_fisher(self) -> bool:
        """Whether ``Σ_k u_k u_kᵀ`` is the loss's output matrix exactly or in expectation over
        labels drawn from the model (the true Fisher, not the empirical one): closed forms
        of that matrix (the softmax structure of cross-entropy) may stand for it."""
        return self.rule.true_fisher

    @property
    def uncorrelated_rows(self) -> bool:
        """Whether the columns of different loss rows are independent draws with zero mean
        (labels drawn from the model): summing a sample's rows before squaring then gives an
        unbiased estimate of the per-row squares."""
        return self.rule.sampled and self.rule.true_fisher

    def draws(self, mc_samples: int) -> int:
        """Columns per loss row that depend on ``mc_samples``: it for sampled types, else 1
        (requests with equal ``(type, draws)`` share their columns)."""
        return mc_samples if self.sampled else 1

    def columns(
        self,
        loss_fn: nn.Module,
        outputs: Tensor,
        targets: Tensor,
        scale: BatchScale,
        mc_samples: int = 1,
    ) -> Tensor:
        """Output-space columns ``[K, N, C]`` on the loss's scale (module docstring) for the
        ``[N, C]`` loss rows ``outputs`` and their ``targets``; rows the loss ignores
        (``scale.valid``) get zero columns."""
        f = outputs.detach()
        if f.dtype not in (torch.float32, torch.float64):
            f = f.float()
        r = 1.0 / scale.inv_reduction if scale.inv_reduction > 0 else 0.0
        cols = self.rule.columns(loss_fn, f, targets, r, mc_samples)
        if scale.valid is not None:
            cols = cols * scale.valid.to(cols.dtype).unsqueeze(-1)
        return cols


#: The values of the built-in Fisher types, as plain strings (with the registered ones:
#: :meth:`FisherType.known`).
FISHER_TYPES: tuple[str, ...] = tuple(t.value for t in FisherType)

#: ``(loss_fn, f [N, C] detached, targets, r, mc_samples) -> columns [K, N, C]`` with
#: ``Σ_k u_k u_kᵀ = r·M_n`` per row (``r`` the reduction factor ``R``).
ColumnFunction = Callable[[nn.Module, Tensor, Tensor, float, int], Tensor]


@dataclass(frozen=True)
class ColumnRule:
    """A Fisher type's output-column rule and what its columns estimate."""

    columns: ColumnFunction
    #: random draws, ``mc_samples`` per loss row
    sampled: bool
    #: ``Σ_k u_k u_kᵀ`` is the loss's output matrix itself
    exact: bool
    #: ... exactly or in expectation over labels drawn from the model
    true_fisher: bool


def _square_root_columns(
    loss_fn: nn.Module, f: Tensor, targets: Tensor, r: float, mc_samples: int
) -> Tensor:
    return output_matrix_sqrt(loss_fn, f) * sqrt(r)


def _sampled_columns(
    loss_fn: nn.Module, f: Tensor, targets: Tensor, r: float, mc_samples: int
) -> Tensor:
    draws = sample_targets(loss_fn, f, num=mc_samples)  # leading axis M
    return label_gradient(loss_fn, f.expand(mc_samples, *f.shape), draws) * sqrt(r / mc_samples)


def _observed_columns(
    loss_fn: nn.Module, f: Tensor, targets: Tensor, r: float, mc_samples: int
) -> Tensor:
    labels = observed_labels(loss_fn, targets)
    return (label_gradient(loss_fn, f, labels) * sqrt(r)).unsqueeze(0)


_RULES: dict[FisherType, ColumnRule] = {
    FisherType.EXACT: ColumnRule(_square_root_columns, sampled=False, exact=True, true_fisher=True),
    FisherType.MC: ColumnRule(_sampled_columns, sampled=True, exact=False, true_fisher=True),
    FisherType.EMPIRICAL: ColumnRule(
        _observed_columns, sampled=False, exact=False, true_fisher=False
    ),
}

_missing = [t.value for t in FisherType if t not in _RULES]
if _missing:  # pragma: no cover - a library edit left a member without its rule
    raise ImportError(f"curvlab: Fisher type(s) {_missing} have no column rule in _RULES.")
